//! The golden billing scenario, `tests/golden/billing/` at the repository
//! root, priced by hand in its README: a support plan across three tiers, a
//! flat fee from mid-month, a credit that expires mid-month and one that
//! carries into the next month, pro-rata requests, a pooled free
//! allowance, 3 reserved instances with 5 running, and a savings plan
//! exceeded in some hours and unused in others. May and then June 2026 are rated as `meter rate` does, June
//! starting from May's credit ledger; every line, invoice and ledger entry
//! must equal the expected files to the cent, and nothing else may appear.

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

use meter_model::Catalog;
use meter_rating::charges::{self, Inputs, PriorUse};
use meter_rating::fixture::{
    hour_rows, usage_csv, Scenario, BILLING_CONTRACTS, BILLING_EXPECTED_INVOICES, BILLING_EXPECTED_LEDGER, BILLING_EXPECTED_LINES,
    BILLING_RUNS, BILLING_USAGE,
};
use meter_rating::{rate_month, Contracts, CreditBalance, Decimal, PriceBook, RatedMonth, YearMonth};

fn rate(month: &str, prior: &PriorUse) -> (RatedMonth, Vec<CreditBalance>) {
    let book = PriceBook::sample().unwrap();
    let catalog = Catalog::builtin();
    let month: YearMonth = month.parse().unwrap();
    let mut rows: Vec<_> = usage_csv(BILLING_USAGE).unwrap().into_iter().filter(|r| month.contains(r.day)).collect();
    let (run_days, minutes) = Scenario::parse(BILLING_RUNS).unwrap().usage(month).unwrap();
    rows.extend(run_days);
    let mut rated = rate_month(&book, &catalog, month, &rows, &minutes).unwrap();
    let contracts = Contracts::parse(BILLING_CONTRACTS).unwrap();
    let hours = hour_rows(&minutes);
    let inputs = Inputs { prior, hours: &hours, book: &book, catalog: &catalog, customer: None, minor_unit_digits: book.minor_unit_digits };
    let ledger = charges::apply(&mut rated, &contracts, &inputs).unwrap();
    (rated, ledger)
}

fn expected(csv: &str) -> Vec<String> {
    csv.lines().skip(1).filter(|l| !l.trim().is_empty()).map(str::to_owned).collect()
}

/// May, June (with May's use of each credit) and July (priced by two versions).
fn both_months() -> Vec<(RatedMonth, Vec<CreditBalance>)> {
    let may = rate("2026-05", &PriorUse::new());
    let prior: PriorUse = may.1.iter().map(|b| (b.credit_id.clone(), b.used)).collect();
    let june = rate("2026-06", &prior);
    let mut prior = prior;
    for b in &june.1 {
        *prior.entry(b.credit_id.clone()).or_default() += b.used;
    }
    let july = rate("2026-07", &prior);
    vec![may, june, july]
}

#[test]
fn billing_golden_lines_invoices_and_ledger_match_the_hand_priced_ones_to_the_cent() {
    let months = both_months();
    let mut lines = Vec::new();
    let mut invoices = Vec::new();
    let mut ledger = Vec::new();
    for (rated, credits) in &months {
        let want = if rated.month.month() == 7 { "2026-04+2026-07-15" } else { "2026-04" };
        assert_eq!(rated.version_id, want, "the April version prices May and June, and July with the July 15 version");
        for l in &rated.lines {
            let k = &l.key;
            lines.push(format!("{},{},{},{},{},{},{}", l.month, k.customer_id, k.service, k.usage_type, k.region, l.line_type, l.amount));
        }
        for i in &rated.invoices {
            invoices.push(format!("{},{},{},{}", i.month, i.customer_id, i.line_count, i.total));
        }
        for b in credits {
            let c = |d: Decimal| format!("{:.2}", d);
            ledger.push(format!(
                "{},{},{},{},{},{},{},{}",
                b.month,
                b.customer_id,
                b.credit_id,
                c(b.amount),
                c(b.opening),
                c(b.used),
                c(b.expired),
                c(b.remaining)
            ));
        }
    }
    assert_eq!(lines, expected(BILLING_EXPECTED_LINES));
    assert_eq!(invoices, expected(BILLING_EXPECTED_INVOICES));
    assert_eq!(ledger, expected(BILLING_EXPECTED_LEDGER));
}

#[test]
fn daily_lines_add_up_to_every_invoice_line_and_credits_never_exceed_charges() {
    for (rated, credits) in both_months() {
        for l in &rated.lines {
            let days: Decimal = rated.daily.iter().filter(|d| d.key == l.key).map(|d| d.cost).sum();
            assert_eq!(days, l.amount_full, "{}", l.key);
        }
        for i in &rated.invoices {
            assert!(i.total >= Decimal::ZERO, "{} {} is negative", i.customer_id, i.total);
        }
        for b in &credits {
            assert!(b.used <= b.opening && b.remaining >= Decimal::ZERO, "{b:?}");
            assert_eq!(b.opening - b.used - b.expired, b.remaining, "{b:?}");
        }
    }
}

#[test]
fn a_price_change_on_the_15th_prices_each_day_with_its_version() {
    let (july, _) = rate("2026-07", &PriorUse::new());
    let days: Vec<(u32, String, String)> = july
        .daily
        .iter()
        .filter(|d| d.key.customer_id == "wayne")
        .map(|d| (d.day.day(), d.price_version_id.clone(), d.cost.normalize().to_string()))
        .collect();
    assert_eq!(days.len(), 31);
    assert!(days[..14].iter().all(|(_, v, c)| v == "2026-04" && c == "11.5"), "{days:?}");
    assert!(days[14..].iter().all(|(_, v, c)| v == "2026-07-15" && c == "10"), "{days:?}");
    let line = july.lines.iter().find(|l| l.key.customer_id == "wayne").unwrap();
    assert_eq!(
        (line.amount.to_string(), line.unit_rate, line.tiers.len()),
        ("331.00".to_owned(), None, 0),
        "two rates: the breakdown is daily"
    );
}

#[test]
fn the_pool_is_drawn_on_by_the_earliest_usage_whichever_service_it_is() {
    let (may, _) = rate("2026-05", &PriorUse::new());
    let free: Vec<(String, String)> = may
        .lines
        .iter()
        .filter(|l| l.key.usage_type == "DataTransfer-Out-Bytes")
        .map(|l| (l.key.service.clone(), l.free_allowance_used.normalize().to_string()))
        .collect();
    // May 1: compute's 60 GB, then 40 of object storage's 70 GB; May 2: nothing left.
    assert_eq!(free, vec![("compute".into(), "60".into()), ("object-storage".into(), "40".into())]);
}

#[test]
fn requests_are_pro_rata_under_the_april_version_and_packages_before_it() {
    let book = PriceBook::sample().unwrap();
    let april = book.version_for(2026, 5).unwrap();
    let get = april.price_for("object-storage", "Requests-GET", "us-east-1").unwrap();
    let c = get.model.charge(Decimal::from(12_345_678)).unwrap();
    assert_eq!(c.amount, "4.9382712".parse::<Decimal>().unwrap());
    let january = book.version_for(2026, 3).unwrap();
    let get = january.price_for("object-storage", "Requests-GET", "us-east-1").unwrap();
    assert_eq!(get.model.charge(Decimal::from(12_345_678)).unwrap().amount, "4.9384".parse::<Decimal>().unwrap());
    // Everything else is inherited unchanged.
    let m5 = |v: &meter_rating::Version| v.price_for("compute", "BoxUsage:m5.large", "eu-west-1").cloned();
    assert_eq!(m5(april), m5(january));
}
