//! What billing on top of usage costs: `rate_month` alone (the baseline)
//! and `rate_month` + `charges::apply` (subscriptions, credits and the
//! pooled allowance) on the same synthetic month, in one run, so the ratio
//! is what contracts add. Each customer has a month of daily rows for five
//! keys: database storage, GET requests, compute and object-storage data
//! transfer out (pooled), and a CDN transfer line; every customer has the
//! business support plan and a credit that expires mid-month.
//!
//! `cargo bench -p meter-rating --bench billing`

#![allow(clippy::unwrap_used)] // benchmark setup

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meter_model::Catalog;
use meter_rating::charges::{self, Inputs, PriorUse};
use meter_rating::{rate_month, Contracts, PriceBook, UsageRow, YearMonth};

const GIB: i128 = 1 << 30;

fn usage(customers: usize, month: YearMonth) -> Vec<UsageRow> {
    let keys: [(&str, &str, &str, i128); 5] = [
        ("database", "StorageUsage-ByteSec", "us-east-1", 500 * GIB * 86_400),
        ("object-storage", "Requests-GET", "us-east-1", 12_345_678),
        ("compute", "DataTransfer-Out-Bytes", "us-east-1", 7 * GIB),
        ("object-storage", "DataTransfer-Out-Bytes", "eu-west-1", 5 * GIB),
        ("cdn", "DataTransfer-Out-Bytes", "edge-us", 40 * GIB),
    ];
    let mut out = Vec::new();
    for c in 0..customers {
        for day in month.iter_days() {
            for (service, usage_type, region, q) in keys {
                out.push(UsageRow {
                    customer_id: format!("cust-{c:05}"),
                    service: service.into(),
                    usage_type: usage_type.into(),
                    region: region.into(),
                    resource_id: String::new(),
                    day,
                    quantity: q + c as i128,
                });
            }
        }
    }
    out
}

fn contracts(customers: usize) -> Contracts {
    let mut text = String::from(meter_rating::SAMPLE_CONTRACTS);
    for c in 0..customers {
        text.push_str(&format!(
            "\n[[subscription]]\ncustomer_id = \"cust-{c:05}\"\nplan = \"business-support\"\nstart = 2026-01-01\n\
             \n[[credit]]\nid = \"promo-{c:05}\"\ncustomer_id = \"cust-{c:05}\"\namount = 25\nstart = 2026-05-01\nexpires = 2026-05-16\n"
        ));
    }
    Contracts::parse(&text).unwrap()
}

fn bench(c: &mut Criterion) {
    let book = PriceBook::sample().unwrap();
    let catalog = Catalog::builtin();
    let month: YearMonth = "2026-05".parse().unwrap();
    let mut group = c.benchmark_group("billing");
    group.sample_size(10);
    for customers in [100usize, 1_000] {
        let rows = usage(customers, month);
        let contracts = contracts(customers);
        group.throughput(Throughput::Elements(rows.len() as u64));
        group.bench_with_input(BenchmarkId::new("rate_month", customers), &customers, |b, _| {
            b.iter(|| rate_month(&book, &catalog, month, &rows, &[]).unwrap());
        });
        group.bench_with_input(BenchmarkId::new("rate_month+contracts", customers), &customers, |b, _| {
            b.iter(|| {
                let mut rated = rate_month(&book, &catalog, month, &rows, &[]).unwrap();
                let prior = PriorUse::new();
                let inputs = Inputs { prior: &prior, hours: &[], book: &book, catalog: &catalog, customer: None, minor_unit_digits: 2 };
                charges::apply(&mut rated, &contracts, &inputs).unwrap()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
