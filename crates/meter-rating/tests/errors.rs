//! Input that cannot be priced as given is refused with a specific error, never guessed at.

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

use meter_model::Catalog;
use meter_rating::{rate_month, Error, MinuteRow, PriceBook, UsageRow, YearMonth};

fn row(service: &str, usage_type: &str, region: &str, day: &str, quantity: i128) -> UsageRow {
    UsageRow {
        customer_id: "c".into(),
        service: service.into(),
        usage_type: usage_type.into(),
        region: region.into(),
        resource_id: "r".into(),
        day: day.parse().unwrap(),
        quantity,
    }
}

fn rate(month: &str, rows: &[UsageRow], minutes: &[MinuteRow]) -> Result<meter_rating::RatedMonth, Error> {
    rate_month(&PriceBook::sample().unwrap(), &Catalog::builtin(), month.parse::<YearMonth>().unwrap(), rows, minutes)
}

#[test]
fn refuses_what_it_cannot_price() {
    let ok = row("object-storage", "Requests-GET", "us-east-1", "2026-02-03", 10);
    assert!(rate("2026-02", std::slice::from_ref(&ok), &[]).is_ok());
    assert!(matches!(rate("2025-12", &[], &[]), Err(Error::NoVersion { .. })));
    let outside = row("object-storage", "Requests-GET", "us-east-1", "2026-03-01", 10);
    assert!(matches!(rate("2026-02", &[outside], &[]), Err(Error::DayOutsideMonth { .. })));
    let negative = row("object-storage", "Requests-GET", "us-east-1", "2026-02-03", -1);
    assert!(matches!(rate("2026-02", &[negative], &[]), Err(Error::NegativeQuantity { .. })));
    let unknown = row("object-storage", "Requests-DELETE", "us-east-1", "2026-02-03", 1);
    assert!(matches!(rate("2026-02", &[unknown], &[]), Err(Error::UnknownUsageType { .. })));
    let huge = row("object-storage", "Requests-GET", "us-east-1", "2026-02-03", i128::MAX);
    assert!(matches!(rate("2026-02", &[huge], &[]), Err(Error::Overflow { .. })));
}

#[test]
fn refuses_a_price_book_without_the_usage_type_or_region() {
    let book = PriceBook::parse(
        "currency = \"EUR\"\n[[version]]\nid = \"x\"\neffective_from = 2026-01-01\n[[version.price]]\nservice = \"cdn\"\nusage_type = \"Requests-HTTPS\"\nregion = \"edge-eu\"\npricing_unit = \"requests\"\nmodel = \"per_unit\"\nrate = \"0.000001\"\n",
    )
    .unwrap();
    let month: YearMonth = "2026-02".parse().unwrap();
    let eu = row("cdn", "Requests-HTTPS", "edge-eu", "2026-02-03", 1_000_000);
    let rated = rate_month(&book, &Catalog::builtin(), month, std::slice::from_ref(&eu), &[]).unwrap();
    assert_eq!((rated.lines[0].amount.to_string(), rated.currency.as_str()), ("1.00".to_owned(), "EUR"));
    let us = row("cdn", "Requests-HTTPS", "edge-us", "2026-02-03", 1);
    assert!(matches!(rate_month(&book, &Catalog::builtin(), month, &[us], &[]), Err(Error::NoPrice { .. })));
}

#[test]
fn refuses_a_broken_minute_series() {
    let minute = |t: i64, q: i128| MinuteRow {
        customer_id: "c".into(),
        service: "compute".into(),
        usage_type: "BoxUsage:m5.large".into(),
        region: "us-east-1".into(),
        resource_id: "r".into(),
        minute_start: t,
        quantity: q,
    };
    let t = "2026-02".parse::<YearMonth>().unwrap().start_millis() + 86_400_000;
    let day = row("compute", "BoxUsage:m5.large", "us-east-1", "2026-02-02", 60);
    assert!(rate("2026-02", std::slice::from_ref(&day), &[minute(t, 60)]).is_ok());
    assert!(matches!(rate("2026-02", std::slice::from_ref(&day), &[minute(t, 30), minute(t, 30)]), Err(Error::BadMinuteSeries { .. })));
    assert!(matches!(rate("2026-02", std::slice::from_ref(&day), &[minute(t + 1, 60)]), Err(Error::BadMinuteSeries { .. })));
    assert!(matches!(rate("2026-02", std::slice::from_ref(&day), &[minute(t, 59)]), Err(Error::MinuteMismatch { .. })));
}
