//! The golden scenario: usage in `golden/usage.toml`, priced by hand in
//! `golden/README.md`, expected lines in `golden/expected_*.csv`.

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

use std::collections::BTreeMap;

use meter_model::Catalog;
use meter_rating::fixture::{parse_quantity, Scenario, GOLDEN_EXPECTED_INVOICES, GOLDEN_EXPECTED_LINES};
use meter_rating::{rate_month, Decimal, PriceBook, RatedMonth, YearMonth};

fn dec(s: &str) -> Decimal {
    s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn rate(month: &str) -> RatedMonth {
    let book = PriceBook::sample().unwrap();
    let catalog = Catalog::builtin();
    let month: YearMonth = month.parse().unwrap();
    let (rows, minutes) = Scenario::golden().unwrap().usage(month).unwrap();
    rate_month(&book, &catalog, month, &rows, &minutes).unwrap()
}

#[test]
fn sample_price_book_prices_every_catalog_usage_type() {
    let book = PriceBook::sample().unwrap();
    let warnings = book.validate(&Catalog::builtin()).unwrap();
    assert!(warnings.is_empty(), "{warnings:#?}");
    let v = book.version_for(2026, 2).unwrap();
    let feb: YearMonth = "2026-02".parse().unwrap();
    // RDS's 10-minute minimum is the longest: 600 minutes of lookahead, one minute of lookbehind.
    assert_eq!(book.minute_series_range(feb), Some((feb.start_millis() - 60_000, feb.end_millis() + 600 * 60_000)));
    assert_eq!(v.usage_types_with_minimum().len(), 5);
    for u in Catalog::builtin().usage_types() {
        assert!(v.price_for(&u.service, &u.name, "us-east-1").is_some(), "{}/{} unpriced", u.service, u.name);
    }
}

#[test]
fn golden_invoice_lines_match_the_hand_priced_ones_to_the_cent() {
    let mut expected = BTreeMap::new();
    for line in GOLDEN_EXPECTED_LINES.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 12, "{line}");
        expected.insert((f[0].to_owned(), f[1].to_owned(), f[2].to_owned(), f[3].to_owned(), f[4].to_owned()), f);
    }
    let mut seen = 0;
    for month in ["2026-02", "2026-03"] {
        let rated = rate(month);
        assert_eq!(rated.version_id, "2026-01");
        for l in &rated.lines {
            let k = (month.to_owned(), l.key.customer_id.clone(), l.key.service.clone(), l.key.usage_type.clone(), l.key.region.clone());
            let f = expected.get(&k).unwrap_or_else(|| panic!("unexpected line {k:?}: {l:#?}"));
            let what = format!("{k:?}");
            assert_eq!(l.usage_quantity, parse_quantity(f[5]).unwrap(), "usage {what}");
            assert_eq!(l.minimum_uplift, parse_quantity(f[6]).unwrap(), "uplift {what}");
            assert_eq!(l.quantity, dec(f[7]), "quantity {what}");
            assert_eq!(l.free_allowance_used, dec(f[8]), "free {what}");
            assert_eq!(l.billable_quantity, dec(f[9]), "billable {what}");
            assert_eq!(l.amount_full, dec(f[10]), "amount_full {what}");
            assert_eq!(l.amount.to_string(), f[11], "amount {what}");
            assert_eq!(l.currency, "USD");
            // The daily lines of this key add up exactly to the monthly amount and quantity.
            let days: Vec<_> = rated.daily.iter().filter(|d| d.key == l.key).collect();
            assert_eq!(days.iter().map(|d| d.cost).sum::<Decimal>(), l.amount_full, "daily sum {what}");
            assert_eq!(days.iter().map(|d| d.quantity).sum::<Decimal>(), l.quantity, "daily quantity {what}");
            assert_eq!(days.iter().map(|d| d.usage_quantity).sum::<i128>(), l.usage_quantity);
            seen += 1;
        }
        let totals: Vec<String> =
            rated.invoices.iter().map(|i| format!("{},{},{},{}", i.month, i.customer_id, i.line_count, i.total)).collect();
        let want: Vec<&str> = GOLDEN_EXPECTED_INVOICES.lines().skip(1).filter(|l| l.starts_with(month)).collect();
        assert_eq!(totals, want);
    }
    assert_eq!(seen, expected.len(), "some expected lines were not produced");
}

#[test]
fn golden_tier_breakdowns() {
    let feb = rate("2026-02");
    let line = |usage_type: &str, region: &str| {
        feb.lines.iter().find(|l| l.key.customer_id == "acme" && l.key.usage_type == usage_type && l.key.region == region).unwrap()
    };
    let s3 = line("TimedStorage-ByteSec", "us-east-1");
    let tiers: Vec<(Decimal, Decimal, Decimal)> = s3.tiers.iter().map(|t| (t.quantity, t.unit_rate, t.amount)).collect();
    assert_eq!(tiers, vec![(dec("51200"), dec("0.023"), dec("1177.6")), (dec("10240"), dec("0.022"), dec("225.28"))]);
    assert_eq!(s3.unit_rate, None);
    let cdn = line("DataTransfer-Out-Bytes", "edge-us");
    assert_eq!(cdn.tiers.iter().map(|t| t.amount).collect::<Vec<_>>(), vec![dec("870.4"), dec("163.84")]);
    let get = line("Requests-GET", "us-east-1");
    assert_eq!((get.packages, get.unit_rate), (Some(dec("12346")), Some(dec("0.0000004"))));
    assert_eq!(line("BoxUsage:m5.large", "eu-west-1").unit_rate, Some(dec("0.107")));
    // S3 storage: the daily lines show the month crossing 51200 GB-month on the 24th.
    let days: Vec<_> = feb.daily.iter().filter(|d| d.key == s3.key).collect();
    assert_eq!(days.len(), 28);
    let per_day = dec("61440") / dec("28");
    assert_eq!(days[0].cost, (per_day * dec("0.023")).round_dp(12));
    assert_eq!(days[27].cost, (per_day * dec("0.022")).round_dp(12));
    assert!(days[23].cost < days[22].cost && days[23].cost > days[24].cost);
}

#[test]
fn rating_one_customer_alone_gives_the_same_lines() {
    let book = PriceBook::sample().unwrap();
    let catalog = Catalog::builtin();
    let month: YearMonth = "2026-02".parse().unwrap();
    let (rows, minutes) = Scenario::golden().unwrap().usage(month).unwrap();
    let all = rate_month(&book, &catalog, month, &rows, &minutes).unwrap();
    let only: Vec<_> = rows.iter().filter(|r| r.customer_id == "globex").cloned().collect();
    let one = rate_month(&book, &catalog, month, &only, &minutes).unwrap();
    let globex: Vec<_> = all.lines.iter().filter(|l| l.key.customer_id == "globex").cloned().collect();
    assert_eq!(one.lines, globex);
    // And again: identical output, identical ids.
    assert_eq!(rate_month(&book, &catalog, month, &rows, &minutes).unwrap(), all);
    // Ids are a pure function of (kind, month, version, key): pinned so a change cannot slip through.
    let l = all.lines.iter().find(|l| l.key.customer_id == "acme" && l.key.usage_type == "Requests-PUT").unwrap();
    assert_eq!(
        l.line_id,
        meter_rating::line_id::line_id(&["invoice-line", "2026-02", "2026-01", "acme", "object-storage", "Requests-PUT", "us-east-1"])
    );
    assert_eq!(l.line_id, "ac4b2dd0f55ecbd3e0b65a373ccdfd98");
    let ids: std::collections::HashSet<&str> = all
        .lines
        .iter()
        .map(|l| l.line_id.as_str())
        .chain(all.daily.iter().map(|d| d.line_id.as_str()))
        .chain(all.invoices.iter().map(|i| i.invoice_id.as_str()))
        .collect();
    assert_eq!(ids.len(), all.lines.len() + all.daily.len() + all.invoices.len());
}

#[test]
fn a_minute_series_that_disagrees_with_the_days_is_refused() {
    let book = PriceBook::sample().unwrap();
    let catalog = Catalog::builtin();
    let month: YearMonth = "2026-02".parse().unwrap();
    let (rows, mut minutes) = Scenario::golden().unwrap().usage(month).unwrap();
    let i = minutes.iter().position(|m| m.resource_id == "i-c5b").unwrap();
    minutes.remove(i);
    let e = rate_month(&book, &catalog, month, &rows, &minutes).unwrap_err();
    assert!(matches!(e, meter_rating::Error::MinuteMismatch { .. }), "{e}");
    let e = rate_month(&book, &catalog, month, &rows, &[]).unwrap_err();
    assert!(matches!(e, meter_rating::Error::MinuteMismatch { .. }), "{e}");
}
