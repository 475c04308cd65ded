"""Pages of the catalog for people browsing it: customers, products, one customer, does a product exist,
what sells with a product and how it sold."""

from __future__ import annotations

from sqlalchemy import func, select, text

from recsys.config import Settings
from recsys.platform.db import get_engine
from recsys.platform.models import Customer, Product


def customer(customer_id: int, settings: Settings) -> dict | None:
    with get_engine(settings).connect() as conn:
        row = conn.execute(select(Customer).where(Customer.customer_id == customer_id)).one_or_none()
    return dict(row._mapping) if row else None


def product_exists(stock_code: str, settings: Settings) -> bool:
    with get_engine(settings).connect() as conn:
        return conn.execute(select(Product.stock_code).where(Product.stock_code == stock_code)).first() is not None


def list_customers(limit: int, offset: int, settings: Settings) -> tuple[list[dict], int]:
    """Customers with the most purchase lines first, and how many there are."""
    with get_engine(settings).connect() as conn:
        total = conn.execute(select(func.count()).select_from(Customer)).scalar_one()
        rows = conn.execute(
            select(Customer)
            .order_by(Customer.purchase_count.desc(), Customer.customer_id)
            .limit(limit)
            .offset(offset)
        ).all()
    return [dict(r._mapping) for r in rows], total


def list_products(limit: int, offset: int, settings: Settings) -> tuple[list[dict], int]:
    """Recommendable products bought by the most customers first, and how many there are."""
    with get_engine(settings).connect() as conn:
        total = conn.execute(select(func.count()).select_from(Product).where(~Product.is_non_product)).scalar_one()
        rows = conn.execute(
            select(Product.stock_code, Product.description, Product.price, Product.customer_count,
                   Product.purchase_count, Product.embedding.is_not(None).label("embedded"))
            .where(~Product.is_non_product)
            .order_by(Product.customer_count.desc(), Product.stock_code)
            .limit(limit)
            .offset(offset)
        ).all()
    return [dict(r._mapping) for r in rows], total


def bought_together(stock_code: str, n: int, settings: Settings) -> list[dict]:
    """The products most often in the same invoice as this one (the `copurchase` view), most orders first."""
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.other_stock_code AS stock_code, p.description, c.invoices FROM copurchase c "
                "JOIN products p ON p.stock_code = c.other_stock_code "
                "WHERE c.stock_code = :code AND NOT p.is_non_product "
                "ORDER BY c.invoices DESC, c.other_stock_code LIMIT :n"
            ),
            {"code": stock_code, "n": n},
        ).all()
    return [dict(r._mapping) for r in rows]


def monthly_sales(stock_code: str, settings: Settings) -> list[dict]:
    """Per calendar month with sales, oldest first: quantity, orders (invoices), customers and revenue."""
    with get_engine(settings).connect() as conn:
        rows = conn.execute(
            text(
                "SELECT date_trunc('month', invoiced_at)::date AS month, sum(quantity) AS quantity, "
                "count(DISTINCT invoice_no) AS orders, count(DISTINCT customer_id) AS customers, "
                "sum(quantity * unit_price) AS revenue "
                "FROM purchases WHERE stock_code = :code GROUP BY 1 ORDER BY 1"
            ),
            {"code": stock_code},
        ).all()
    return [dict(r._mapping) for r in rows]
