"""Loading and reading the catalog: ingest, embed, stats, search, history."""

from __future__ import annotations

from pathlib import Path

import click

from recsys.cli.common import SERVICE_FAILURE, emit, ensure_database, fail, json_option

INGEST_STAGES = ("read", "clean", "parse", "copy", "insert", "aggregate", "copurchase")


@click.command("ingest")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
def ingest(path: Path, as_json: bool) -> None:
    """Load an Online Retail file (.csv, .csv.gz, .xlsx; UTF-8 or ISO-8859-1)."""
    from recsys.catalog.ingest import IngestError, ingest_file

    if not path.is_file():
        fail(f"no such file: {path}")
    settings = ensure_database()
    from tqdm import tqdm

    with tqdm(total=len(INGEST_STAGES), desc=f"ingest {path.name}", unit="step", disable=None) as bar:

        def step(stage: str) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)

        try:
            report = ingest_file(path, settings, progress=step)
        except IngestError as exc:
            fail(str(exc))
    emit(report.as_dict(), as_json, _render_ingest)


def _render_ingest(report: dict) -> None:
    click.echo(
        f"read {report['rows_read']:,} rows; cleaned out {report['rows_cleaned_out']:,} "
        f"(nulls {report['rows_with_nulls']:,}, duplicates {report['duplicate_rows']:,}, "
        f"cancelled {report['cancelled_rows']:,}); rejected {report['rows_rejected']:,}; "
        f"loaded {report['rows_loaded']:,} ({report['rows_new']:,} new) in {report['seconds']:.1f} s; "
        f"co-purchase counts {report['copurchase_mode']} in {report['copurchase_refresh_seconds']:.1f} s"
    )
    click.echo(
        f"catalog: {report['purchases_total']:,} purchases, {report['customers_total']:,} customers, "
        f"{report['products_total']:,} products"
    )


@click.command("embed")
@json_option
def embed(as_json: bool) -> None:
    """Embed every product that has no embedding from the configured model."""
    from recsys.catalog.embedding import EmbeddingError, embed_products

    settings = ensure_database()
    from tqdm import tqdm

    bar = tqdm(desc=f"embed ({settings.embedding_model})", unit="product", disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        report = embed_products(settings, progress=progress)
    except EmbeddingError as exc:
        fail(str(exc), SERVICE_FAILURE)
    finally:
        bar.close()
    emit(
        report.as_dict(),
        as_json,
        lambda r: click.echo(f"embedded {r['embedded']:,} products with {r['model']} in {r['seconds']:.1f} s"),
    )


@click.command("stats")
@json_option
def stats(as_json: bool) -> None:
    """Counts: purchases, customers, products, embedding coverage."""
    from recsys.catalog.retrieval import stats as catalog_stats

    data = catalog_stats(ensure_database())
    emit(data, as_json, lambda d: [click.echo(f"{k:20} {v}") for k, v in d.items()])


@click.command("search")
@click.argument("query")
@click.option("-k", "k", default=10, show_default=True, type=int, help="How many products.")
@click.option("--customer", "customer_id", type=int, default=None, help="Customer the search is for.")
@click.option("--exclude-purchased", is_flag=True, help="Leave out what --customer already bought.")
@click.option("--hybrid", is_flag=True, help="Fuse full-text and vector search (reciprocal rank).")
@click.option("--ef-search", type=int, default=None, help="HNSW ef_search for this query (RECSYS_EF_SEARCH).")
@json_option
def search(
    query: str,
    k: int,
    customer_id: int | None,
    exclude_purchased: bool,
    hybrid: bool,
    ef_search: int | None,
    as_json: bool,
) -> None:
    """Products nearest to QUERY by cosine similarity (HNSW index)."""
    from recsys.catalog.retrieval import search as catalog_search

    if k <= 0:
        fail(f"-k must be a positive integer, got {k}")
    if not query.strip():
        fail("the query text is empty")
    if exclude_purchased and customer_id is None:
        fail("--exclude-purchased needs --customer")
    if hybrid and exclude_purchased:
        fail("--hybrid cannot be combined with --exclude-purchased")
    hits = catalog_search(
        query,
        k,
        ensure_database(),
        ef_search=ef_search,
        customer_id=customer_id,
        exclude_purchased=exclude_purchased,
        hybrid=hybrid,
    )
    emit([h.as_dict() for h in hits], as_json, _render_hits)


@click.command("similar")
@click.argument("stock_code")
@click.option("-k", "k", default=10, show_default=True, type=int, help="How many products.")
@click.option("--ef-search", type=int, default=None, help="HNSW ef_search for this query.")
@json_option
def similar(stock_code: str, k: int, ef_search: int | None, as_json: bool) -> None:
    """Products nearest to STOCK_CODE (itself and non-products excluded)."""
    from recsys.catalog.retrieval import product
    from recsys.catalog.retrieval import similar as similar_products

    if k <= 0:
        fail(f"-k must be a positive integer, got {k}")
    settings = ensure_database()
    if product(stock_code, settings) is None:
        fail(f"unknown stock code {stock_code!r}")
    hits = similar_products(stock_code, k, settings, ef_search=ef_search)
    emit([h.as_dict() for h in hits], as_json, _render_hits)


def _render_hits(hits: list[dict]) -> None:
    for rank, hit in enumerate(hits, 1):
        click.echo(f"{rank:3}. {hit['stock_code']:10} {hit['score']:.3f}  {hit['description']}")


@click.command("history")
@click.argument("customer_id", type=int)
@click.option("-n", "n", default=10, show_default=True, type=int, help="How many products.")
@click.option(
    "--order",
    type=click.Choice(["recent", "seed"]),
    default="recent",
    show_default=True,
    help="recent: most recently bought first; seed: the notebook's (stock codes sorted).",
)
@json_option
def history(customer_id: int, n: int, order: str, as_json: bool) -> None:
    """A customer's purchased products."""
    from recsys.catalog.history import history as customer_history
    from recsys.catalog.listing import customer

    if n <= 0:
        fail(f"-n must be a positive integer, got {n}")
    settings = ensure_database()
    entries = customer_history(customer_id, n, order, settings)
    if not entries and customer(customer_id, settings) is None:
        fail(f"no customer {customer_id}")  # as the API's 404
    emit(
        [e.as_dict() for e in entries],
        as_json,
        lambda rows: [
            click.echo(f"{r['last_purchased_at']}  {r['stock_code']:10} x{r['quantity']:<5} {r['description']}")
            for r in rows
        ],
    )


def register(cli: click.Group) -> None:
    for command in (ingest, embed, stats, search, similar, history):
        cli.add_command(command)
