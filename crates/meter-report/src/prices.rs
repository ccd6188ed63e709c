//! `meter prices load [--file F]`: validates a price book against the
//! catalog and writes it to ClickHouse (`price_book`) for analysts.
//!
//! A version that is already stored with different prices is refused unless
//! `--replace`: a version that has priced a month must not change (a price
//! change is a new version), or re-rating that month would give different
//! amounts under the same version id.

use crate::rating;
use anyhow::Context;
use clap::Subcommand;
use meter_config::Config;
use meter_rating::PriceBook;

#[derive(Subcommand)]
pub enum PricesCommand {
    /// Validate a price book against the catalog and write it to ClickHouse.
    Load {
        /// Price book file; default: `rating.price_book`, else the sample
        /// built into the binary (schemas/pricebook.toml).
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// Overwrite versions stored with different prices.
        #[arg(long)]
        replace: bool,
    },
}

pub async fn run(cfg: &Config, cmd: PricesCommand) -> anyhow::Result<()> {
    let PricesCommand::Load { file, replace } = cmd;
    let mut cfg = cfg.clone();
    if file.is_some() {
        cfg.rating.price_book = file;
    }
    let book: PriceBook = crate::rate::price_book(&cfg)?;
    let now = meter_model::now_ms();
    let rows = rating::price_book_rows(&book, u32::try_from(now / 1000).unwrap_or(0), u64::try_from(now).unwrap_or(0))?;
    let client = meter_clickhouse::Connection::from(&cfg.clickhouse).writer()?;
    if !replace {
        let stored = rating::stored_price_book(&client).await.context("reading the stored price book")?;
        let strip = |r: &rating::PriceBookRow| rating::PriceBookRow { loaded_at: 0, revision: 0, ..r.clone() };
        for v in book.versions() {
            let mut old: Vec<_> = stored.iter().filter(|r| r.version_id == v.id).map(strip).collect();
            let mut new: Vec<_> = rows.iter().filter(|r| r.version_id == v.id).map(strip).collect();
            let key = |r: &rating::PriceBookRow| (r.service.clone(), r.usage_type.clone(), r.region.clone(), r.tier);
            old.sort_by_key(key);
            new.sort_by_key(key);
            if !old.is_empty() && old != new {
                anyhow::bail!(
                    "price-book version {} is stored with different prices; a price change is a new version \
                     (pass --replace to overwrite it anyway)",
                    v.id
                );
            }
        }
    }
    let counts = rating::load_price_book(&client, &rows).await.context("writing the price book")?;
    let versions: Vec<&str> = book.versions().iter().map(|v| v.id.as_str()).collect();
    println!("price book loaded: versions {} ({} rows: {counts})", versions.join(", "), rows.len());
    Ok(())
}
