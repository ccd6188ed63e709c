//! Property tests for every pricing model and for rating as a whole.

#![allow(clippy::unwrap_used)] // test helpers: a failure should panic with the error

use meter_model::Catalog;
use meter_rating::model::price;
use meter_rating::{rate_month, Date, Decimal, MinuteRow, Model, PriceBook, Tier, UsageRow, YearMonth};
use proptest::prelude::*;

/// A non-negative decimal with up to `scale` places.
fn dec(max: i64, scale: u32) -> impl Strategy<Value = Decimal> {
    (0..=max).prop_map(move |m| Decimal::new(m, scale))
}

/// 1..=5 tiers with strictly increasing bounds, the last open; any rates.
fn tiers() -> impl Strategy<Value = Vec<Tier>> {
    prop::collection::vec((1i64..5_000_000, 0i64..100_000), 1..=5).prop_map(|v| {
        let mut bound = Decimal::ZERO;
        let n = v.len();
        v.into_iter()
            .enumerate()
            .map(|(i, (step, rate))| {
                bound += Decimal::new(step, 2);
                Tier { up_to: (i + 1 < n).then_some(bound), rate: Decimal::new(rate, 4) }
            })
            .collect()
    })
}

fn package() -> impl Strategy<Value = Model> {
    (1i64..100_000, 0i64..100_000).prop_map(|(size, p)| Model::Package { size: Decimal::new(size, 1), price: Decimal::new(p, 4) })
}

fn any_model() -> impl Strategy<Value = Model> {
    prop_oneof![
        dec(100_000, 4).prop_map(|rate| Model::PerUnit { rate }),
        tiers().prop_map(|tiers| Model::Graduated { tiers }),
        tiers().prop_map(|tiers| Model::Volume { tiers }),
        package(),
    ]
}

fn monotone_model() -> impl Strategy<Value = Model> {
    prop_oneof![dec(100_000, 4).prop_map(|rate| Model::PerUnit { rate }), tiers().prop_map(|tiers| Model::Graduated { tiers }), package()]
}

fn cost(m: &Model, q: Decimal) -> Decimal {
    m.charge(q).unwrap().amount
}

/// (lower bound, upper bound) of each tier.
fn bounds(tiers: &[Tier]) -> Vec<(Decimal, Option<Decimal>)> {
    let mut lo = Decimal::ZERO;
    tiers
        .iter()
        .map(|t| {
            let b = (lo, t.up_to);
            lo = t.up_to.unwrap_or(lo);
            b
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn per_unit_graduated_and_package_are_monotonic(m in monotone_model(), a in dec(1_000_000_000, 3), b in dec(1_000_000_000, 3)) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        prop_assert!(cost(&m, lo) <= cost(&m, hi), "{m:?}: cost({lo}) > cost({hi})");
    }

    #[test]
    fn graduated_is_the_sum_over_its_tiers(t in tiers(), q in dec(1_000_000_000, 3)) {
        // Independent: rate × the part of q inside each tier (all terminating, so exact).
        let mut want = Decimal::ZERO;
        for ((lo, hi), tier) in bounds(&t).into_iter().zip(&t) {
            let top = hi.map_or(q, |h| q.min(h));
            if top > lo {
                want += (top - lo) * tier.rate;
            }
        }
        let c = Model::Graduated { tiers: t.clone() }.charge(q).unwrap();
        prop_assert_eq!(c.amount, want);
        prop_assert_eq!(c.tiers.iter().map(|x| x.quantity).sum::<Decimal>(), q);
        prop_assert_eq!(c.tiers.iter().map(|x| x.amount).sum::<Decimal>(), c.amount);
    }

    #[test]
    fn volume_prices_all_of_the_quantity_at_exactly_one_tier(t in tiers(), q in dec(1_000_000_000, 3), extra in dec(1_000_000, 3)) {
        let m = Model::Volume { tiers: t.clone() };
        let c = m.charge(q).unwrap();
        let containing: Vec<usize> = bounds(&t)
            .into_iter()
            .enumerate()
            .filter(|(i, (lo, hi))| (q > *lo || (*i == 0 && q.is_zero())) && hi.is_none_or(|h| q <= h))
            .map(|(i, _)| i)
            .collect();
        prop_assert_eq!(containing.len(), 1);
        let rate = t[containing[0]].rate;
        prop_assert_eq!(c.amount, q * rate);
        prop_assert_eq!(c.unit_rate, Some(rate));
        prop_assert!(c.tiers.len() <= 1);
        // Monotonic while the quantity stays in its tier (across bounds it need not be).
        let q2 = q + extra;
        if t[containing[0]].up_to.is_none_or(|h| q2 <= h) {
            prop_assert!(cost(&m, q) <= cost(&m, q2));
        }
    }

    #[test]
    fn packages_round_up(m in package(), q in dec(1_000_000_000, 3)) {
        let Model::Package { size, price: p } = &m else { unreachable!() };
        let c = m.charge(q).unwrap();
        let n = c.packages.unwrap();
        prop_assert_eq!(n, n.trunc());
        prop_assert!(n * size >= q, "{n} packages of {size} do not cover {q}");
        prop_assert!(n.is_zero() || (n - Decimal::ONE) * size < q, "{n} packages of {size} for {q}: one too many");
        prop_assert_eq!(c.amount, n * p);
    }

    #[test]
    fn free_allowance_never_makes_cost_negative_nor_higher(m in any_model(), free in dec(10_000_000, 2), q in dec(1_000_000_000, 3)) {
        let with = price(&m, free, q).unwrap();
        prop_assert!(with.charge.amount >= Decimal::ZERO);
        prop_assert_eq!(with.free_allowance_used, q.min(free));
        prop_assert_eq!(with.billable, (q - free).max(Decimal::ZERO));
        prop_assert_eq!(with.free_allowance_used + with.billable, q);
        if !matches!(m, Model::Volume { .. }) {
            prop_assert!(with.charge.amount <= cost(&m, q));
        }
    }
}

// ---- rating as a whole --------------------------------------------------------

fn model_toml(m: &Model) -> String {
    let tiers = |t: &[Tier]| {
        let items: Vec<String> = t
            .iter()
            .map(|t| match t.up_to {
                Some(u) => format!("{{ up_to = \"{u}\", rate = \"{}\" }}", t.rate),
                None => format!("{{ rate = \"{}\" }}", t.rate),
            })
            .collect();
        format!("tiers = [{}]", items.join(", "))
    };
    match m {
        Model::PerUnit { rate } => format!("model = \"per_unit\"\nrate = \"{rate}\""),
        Model::Graduated { tiers: t } => format!("model = \"graduated\"\n{}", tiers(t)),
        Model::Volume { tiers: t } => format!("model = \"volume\"\n{}", tiers(t)),
        Model::Package { size, price } => format!("model = \"package\"\npackage_size = \"{size}\"\npackage_price = \"{price}\""),
        _ => unreachable!(),
    }
}

/// A book pricing storage (GB-month) and t3.micro (hours, optional minimum) with the given models.
fn book(storage: &Model, compute: &Model, free: Decimal, minimum: Option<u32>) -> PriceBook {
    let min = minimum.map(|m| format!("minimum_seconds = {m}\n")).unwrap_or_default();
    let text = format!(
        "currency = \"USD\"\n[[version]]\nid = \"p\"\neffective_from = 2026-01-01\n\
         [[version.price]]\nservice = \"object-storage\"\nusage_type = \"TimedStorage-ByteSec\"\npricing_unit = \"GB-month\"\nfree_allowance = \"{free}\"\n{}\n\
         [[version.price]]\nservice = \"compute\"\nusage_type = \"BoxUsage:t3.micro\"\npricing_unit = \"hours\"\nfree_allowance = \"{free}\"\n{min}{}\n",
        model_toml(storage),
        model_toml(compute)
    );
    PriceBook::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn row(customer: &str, service: &str, usage_type: &str, resource: &str, day: Date, quantity: i128) -> UsageRow {
    UsageRow {
        customer_id: customer.into(),
        service: service.into(),
        usage_type: usage_type.into(),
        region: "us-east-1".into(),
        resource_id: resource.into(),
        day,
        quantity,
    }
}

fn month_strategy() -> impl Strategy<Value = YearMonth> {
    prop_oneof![Just("2026-02"), Just("2026-03"), Just("2026-04"), Just("2028-02")].prop_map(|m| m.parse().unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn daily_costs_sum_exactly_to_the_month(
        storage in any_model(),
        compute in any_model(),
        free in dec(100_000, 2),
        month in month_strategy(),
        days in prop::collection::vec((0u32..31, 0i128..(1i128 << 62), 0i128..86_400), 1..40),
    ) {
        let b = book(&storage, &compute, free, None);
        let mut rows = Vec::new();
        for (i, (d, bytes_s, secs)) in days.into_iter().enumerate() {
            let day = month.iter_days().nth(d as usize % month.days() as usize).unwrap();
            let customer = if i % 3 == 0 { "c1" } else { "c2" };
            rows.push(row(customer, "object-storage", "TimedStorage-ByteSec", "", day, bytes_s * 1_000_003));
            rows.push(row(customer, "compute", "BoxUsage:t3.micro", "", day, secs));
        }
        let rated = rate_month(&b, &Catalog::builtin(), month, &rows, &[]).unwrap();
        prop_assert!(!rated.lines.is_empty());
        for l in &rated.lines {
            let days: Vec<_> = rated.daily.iter().filter(|d| d.key == l.key).collect();
            prop_assert_eq!(days.iter().map(|d| d.cost).sum::<Decimal>(), l.amount_full);
            prop_assert_eq!(days.iter().map(|d| d.quantity).sum::<Decimal>(), l.quantity);
            prop_assert!(l.amount_full >= Decimal::ZERO);
            prop_assert_eq!(l.amount, l.amount_full.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven));
            prop_assert!((l.amount - l.amount_full).abs() <= Decimal::new(5, 3));
        }
        for inv in &rated.invoices {
            let sum: Decimal = rated.lines.iter().filter(|l| l.key.customer_id == inv.customer_id).map(|l| l.amount).sum();
            prop_assert_eq!(inv.total, sum);
        }
    }

    #[test]
    fn minimums_apply_per_resource_run(
        minimum in 1u32..900,
        // Per resource: a pattern of minutes, 0 = idle, else seconds used.
        resources in prop::collection::vec(prop::collection::vec(prop_oneof![3 => Just(0i128), 2 => 1i128..=60], 1..200), 1..4),
        offset_minutes in 0i64..(28 * 1440 - 200),
    ) {
        let month: YearMonth = "2026-02".parse().unwrap();
        let per_unit = Model::PerUnit { rate: Decimal::ONE };
        let b = book(&per_unit, &per_unit, Decimal::ZERO, Some(minimum));
        let start = month.start_millis() + offset_minutes * 60_000;
        let (mut minutes, mut rows) = (Vec::new(), Vec::new());
        let (mut want_billed, mut used_total, mut run_count) = (0i128, 0i128, 0i128);
        for (r, pattern) in resources.iter().enumerate() {
            let resource = format!("i-{r}");
            // Independent run accounting: close a run at every idle minute and at the end.
            let mut run = 0i128;
            for (i, &q) in pattern.iter().chain(std::iter::once(&0)).enumerate() {
                if q > 0 {
                    run += q;
                } else if run > 0 {
                    want_billed += run.max(i128::from(minimum));
                    used_total += run;
                    run_count += 1;
                    run = 0;
                }
                if q > 0 && i < pattern.len() {
                    let t = start + i as i64 * 60_000;
                    minutes.push(MinuteRow {
                        customer_id: "c".into(),
                        service: "compute".into(),
                        usage_type: "BoxUsage:t3.micro".into(),
                        region: "us-east-1".into(),
                        resource_id: resource.clone(),
                        minute_start: t,
                        quantity: q,
                    });
                    rows.push(row("c", "compute", "BoxUsage:t3.micro", &resource, Date::from_millis(t).unwrap(), q));
                }
            }
        }
        prop_assume!(!rows.is_empty());
        let rated = rate_month(&b, &Catalog::builtin(), month, &rows, &minutes).unwrap();
        prop_assert_eq!(rated.lines.len(), 1);
        let l = &rated.lines[0];
        prop_assert_eq!(l.usage_quantity, used_total);
        prop_assert_eq!(l.usage_quantity + l.minimum_uplift, want_billed);
        prop_assert!(want_billed >= run_count * i128::from(minimum));
        // Rate 1 per hour: the amount is the billed hours.
        prop_assert_eq!(l.amount_full, (Decimal::from(want_billed) / Decimal::from(3600)).round_dp(12));
    }
}

#[test]
fn volume_daily_lines_credit_the_day_that_reaches_a_cheaper_tier() {
    let vol = Model::Volume {
        tiers: vec![Tier { up_to: Some(Decimal::from(10)), rate: Decimal::ONE }, Tier { up_to: None, rate: Decimal::new(5, 1) }],
    };
    let b = book(&vol, &vol, Decimal::ZERO, None);
    let month: YearMonth = "2026-02".parse().unwrap();
    let day = |d| month.iter_days().nth(d).unwrap();
    // Day one: 9 h at 1.00 = 9. Day two adds 3 h: the month's 12 h are all priced at 0.50 = 6,
    // so day two carries 6 − 9 = −3 (a credit for day one, now in the cheaper tier).
    let rows = vec![
        row("c", "compute", "BoxUsage:t3.micro", "", day(0), 9 * 3600),
        row("c", "compute", "BoxUsage:t3.micro", "", day(1), 3 * 3600),
    ];
    let rated = rate_month(&b, &Catalog::builtin(), month, &rows, &[]).unwrap();
    let costs: Vec<Decimal> = rated.daily.iter().map(|d| d.cost).collect();
    assert_eq!(costs, vec![Decimal::from(9), Decimal::from(-3)]);
    assert_eq!(rated.lines[0].amount_full, Decimal::from(6));
}
