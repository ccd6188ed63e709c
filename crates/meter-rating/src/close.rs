//! Period close: a customer's month, frozen. Pure.
//!
//! Once a month is closed for a customer ([`CloseRecord`]), its invoice and
//! lines never change. Usage that arrives later for it (a correction inside
//! the processor's horizon that was still in flight, or a replay) is billed
//! on the customer's next open month as adjustment lines
//! ([`adjustments`]): per line key of the closed month, what rating it now
//! gives less what was frozen, less what earlier open months already
//! billed for it. So the frozen invoices plus every adjustment always add up
//! to the month as it would be rated now, to the cent, and a closed invoice
//! that billing has paid is never rewritten. This is how a cloud provider
//! treats post-close corrections.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::date::YearMonth;
use crate::decimal::to_minor_unit;
use crate::error::{Error, Result};
use crate::line_id::line_id;
use crate::rate::{DailyLine, InvoiceLine, LineKey, LineType};

/// What closing a customer's month publishes (and `closed_periods` keeps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CloseRecord {
    pub month: YearMonth,
    pub customer_id: String,
    pub version_id: String,
    pub invoice_id: String,
    pub currency: String,
    pub line_count: usize,
    /// The invoice total: the sum of the lines' billed amounts.
    pub total: Decimal,
    /// [`checksum`] of the lines.
    pub checksum: String,
    /// Per line: id, type, billed amount, sorted by id.
    pub lines: Vec<(String, LineType, Decimal)>,
    /// When it was closed, epoch milliseconds.
    pub closed_at_ms: i64,
}

/// SHA-256, lowercase hex, over one text line per invoice line, sorted by
/// line id: `{line_id},{line_type},{amount}\n`, the amount with exactly
/// the currency's minor-unit digits (`-28.94`, `0.00`). A billing consumer
/// recomputes it from the lines it received on `billing.invoice_lines` to
/// know it has exactly the closed invoice.
pub fn checksum(lines: &[(String, LineType, Decimal)]) -> String {
    let mut sorted: Vec<&(String, LineType, Decimal)> = lines.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (id, t, amount) in sorted {
        h.update(format!("{id},{t},{amount}\n").as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The close record of `customer`'s `lines` (those of one month and version).
pub fn close_record(
    month: YearMonth,
    customer: &str,
    invoice_id: &str,
    lines: &[InvoiceLine],
    digits: u32,
    closed_at_ms: i64,
) -> Result<CloseRecord> {
    let mine: Vec<&InvoiceLine> = lines.iter().filter(|l| l.key.customer_id == customer).collect();
    let first = mine.first().ok_or_else(|| Error::Internal(format!("closing {month} for {customer}: no invoice lines")))?;
    let mut out_lines = Vec::with_capacity(mine.len());
    let mut total = Decimal::ZERO;
    for l in &mine {
        let amount = to_minor_unit(l.amount, digits)?;
        total += amount;
        out_lines.push((l.line_id.clone(), l.line_type, amount));
    }
    out_lines.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(CloseRecord {
        month,
        customer_id: customer.to_owned(),
        version_id: first.version_id.clone(),
        invoice_id: invoice_id.to_owned(),
        currency: first.currency.clone(),
        line_count: out_lines.len(),
        total: to_minor_unit(total, digits)?,
        checksum: checksum(&out_lines),
        lines: out_lines,
        closed_at_ms,
    })
}

/// The key of the adjustment, billed in a later month, of `key` of closed `month`.
pub fn adjustment_key(month: YearMonth, key: &LineKey) -> LineKey {
    LineKey { usage_type: format!("Adjustment:{month}:{}", key.usage_type), ..key.clone() }
}

/// Adjustment lines for closed `month`, billed in open month `target`:
/// per key, `fresh` (the month rated now) less `frozen` (its closed lines)
/// less `billed` (adjustments of it in months between, closed since). A key
/// with nothing to adjust gets no line. Each adjustment has one daily line,
/// on the first day of `target`. Amounts: `amount` is the difference of the
/// billed (rounded) amounts, so frozen + adjustments = fresh to the cent.
pub fn adjustments(
    month: YearMonth,
    fresh: &[InvoiceLine],
    frozen: &[InvoiceLine],
    billed: &[InvoiceLine],
    target: YearMonth,
    version_id: &str,
) -> Result<(Vec<DailyLine>, Vec<InvoiceLine>)> {
    // key -> (usage, amount_full, amount): fresh - frozen - billed
    let mut delta: BTreeMap<LineKey, (i128, Decimal, Decimal, String, String)> = BTreeMap::new();
    for (lines, sign) in [(fresh, 1i8), (frozen, -1), (billed, -1)] {
        for l in lines {
            let key = if l.line_type == LineType::Adjustment { original_key(&l.key, month)? } else { l.key.clone() };
            let e = delta.entry(key).or_insert_with(|| (0, Decimal::ZERO, Decimal::ZERO, l.pricing_unit.clone(), l.currency.clone()));
            let s = Decimal::from(sign);
            e.0 += i128::from(sign) * l.usage_quantity;
            e.1 += s * l.amount_full;
            e.2 += s * l.amount;
        }
    }
    let (target_s, day) = (target.to_string(), target.first_day());
    let mut daily = Vec::new();
    let mut lines = Vec::new();
    for (key, (usage, full, amount, pricing_unit, currency)) in delta {
        if usage == 0 && full.is_zero() && amount.is_zero() {
            continue;
        }
        let key = adjustment_key(month, &key);
        let ids = [target_s.as_str(), version_id, &key.customer_id, &key.service, &key.usage_type, &key.region];
        let day_s = day.to_string();
        daily.push(DailyLine {
            line_id: line_id(&[&["daily"], &ids[..], &[day_s.as_str()]].concat()),
            month: target,
            day,
            key: key.clone(),
            line_type: LineType::Adjustment,
            usage_quantity: usage,
            minimum_uplift: 0,
            pricing_unit: pricing_unit.clone(),
            quantity: Decimal::ZERO,
            cost: full,
            version_id: version_id.to_owned(),
            price_version_id: String::new(),
            currency: currency.clone(),
        });
        lines.push(InvoiceLine {
            line_id: line_id(&[&["invoice-line"], &ids[..]].concat()),
            month: target,
            key,
            line_type: LineType::Adjustment,
            usage_quantity: usage,
            minimum_uplift: 0,
            pricing_unit,
            quantity: Decimal::ZERO,
            free_allowance_used: Decimal::ZERO,
            billable_quantity: Decimal::ZERO,
            tiers: Vec::new(),
            packages: None,
            unit_rate: None,
            amount_full: full,
            amount,
            version_id: version_id.to_owned(),
            currency,
        });
    }
    Ok((daily, lines))
}

/// The key in closed `month` that an adjustment line adjusts.
fn original_key(key: &LineKey, month: YearMonth) -> Result<LineKey> {
    let prefix = format!("Adjustment:{month}:");
    let usage_type = key.usage_type.strip_prefix(&prefix).ok_or_else(|| Error::Internal(format!("{key}: not an adjustment of {month}")))?;
    Ok(LineKey { usage_type: usage_type.to_owned(), ..key.clone() })
}

/// The month an adjustment line (usage type `Adjustment:YYYY-MM:...`) adjusts.
pub fn adjusted_month(line: &InvoiceLine) -> Option<YearMonth> {
    let rest = line.key.usage_type.strip_prefix("Adjustment:")?;
    rest.get(..7)?.parse().ok()
}

/// Whether the correction horizon of `month`'s last day has passed at `now_ms`:
/// no usage the processor accepts can change the month any more.
pub fn closable(month: YearMonth, correction_horizon_ms: i64, now_ms: i64) -> bool {
    now_ms >= month.end_millis().saturating_add(correction_horizon_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(usage_type: &str, line_type: LineType, amount_full: &str, amount: &str, usage: i128) -> InvoiceLine {
        let d = |s: &str| s.parse::<Decimal>().unwrap_or_default();
        InvoiceLine {
            line_id: format!("id-{usage_type}"),
            month: "2026-05".parse().unwrap_or_else(|_| unreachable!()),
            key: LineKey { customer_id: "c".into(), service: "s".into(), usage_type: usage_type.into(), region: "r".into() },
            line_type,
            usage_quantity: usage,
            minimum_uplift: 0,
            pricing_unit: "hours".into(),
            quantity: Decimal::ZERO,
            free_allowance_used: Decimal::ZERO,
            billable_quantity: Decimal::ZERO,
            tiers: Vec::new(),
            packages: None,
            unit_rate: None,
            amount_full: d(amount_full),
            amount: d(amount),
            version_id: "v".into(),
            currency: "USD".into(),
        }
    }

    #[test]
    fn adjustments_bill_what_changed_since_close_once() {
        let (may, june, july): (YearMonth, YearMonth, YearMonth) = (
            "2026-05".parse().unwrap_or_else(|_| unreachable!()),
            "2026-06".parse().unwrap_or_else(|_| unreachable!()),
            "2026-07".parse().unwrap_or_else(|_| unreachable!()),
        );
        let frozen = vec![line("A", LineType::Usage, "1.004", "1.00", 10)];
        let fresh = vec![line("A", LineType::Usage, "1.506", "1.51", 15), line("B", LineType::Usage, "0.5", "0.50", 5)];
        let (daily, adj) = adjustments(may, &fresh, &frozen, &[], june, "v").unwrap_or_else(|e| panic!("{e}"));
        let got: Vec<(String, String, String, i128)> =
            adj.iter().map(|l| (l.key.usage_type.clone(), l.amount_full.to_string(), l.amount.to_string(), l.usage_quantity)).collect();
        assert_eq!(
            got,
            vec![
                ("Adjustment:2026-05:A".into(), "0.502".into(), "0.51".into(), 5),
                ("Adjustment:2026-05:B".into(), "0.5".into(), "0.50".into(), 5)
            ]
        );
        assert!(daily.iter().all(|d| d.day == june.first_day() && d.month == june));
        // June closed with those adjustments: July bills only what changed after.
        let (_, again) = adjustments(may, &fresh, &frozen, &adj, july, "v").unwrap_or_else(|e| panic!("{e}"));
        assert!(again.is_empty(), "{again:?}");
        assert_eq!(adjusted_month(&adj[0]), Some(may));
    }

    #[test]
    fn the_checksum_is_over_sorted_lines_and_changes_with_any_cent() {
        let a = vec![
            ("b".to_owned(), LineType::Usage, "1.00".parse().unwrap_or_default()),
            ("a".to_owned(), LineType::Credit, "-1.00".parse().unwrap_or_default()),
        ];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(checksum(&a), checksum(&b));
        let mut h = Sha256::new();
        h.update(b"a,Credit,-1.00\nb,Usage,1.00\n");
        let want: String = h.finalize().iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(checksum(&a), want);
        b[0].2 = "1.01".parse().unwrap_or_default();
        assert_ne!(checksum(&a), checksum(&b));
    }

    #[test]
    fn a_month_closes_only_after_its_last_day_plus_the_horizon() {
        let may: YearMonth = "2026-05".parse().unwrap_or_else(|_| unreachable!());
        let horizon = 35 * 86_400_000;
        assert!(!closable(may, horizon, may.end_millis() + horizon - 1));
        assert!(closable(may, horizon, may.end_millis() + horizon));
    }
}
