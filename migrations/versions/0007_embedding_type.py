"""Products' embeddings stored as RECSYS_EMBEDDING_TYPE: vector (float32) or halfvec (float16).

The column is converted and the HNSW index rebuilt with the matching operator class and build
settings sized from the catalog (recsys.platform.hnsw). `recsys db upgrade` applies the setting
again after every upgrade to head, so changing it later converts an existing database; the
downgrade stores vector again, the type every earlier revision expects.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

from alembic import context, op

from recsys.config import get_settings
from recsys.platform import hnsw

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    settings = context.config.attributes.get("settings") or get_settings()
    hnsw.convert_embedding_type(op.get_bind(), settings.embedding_type)


def downgrade() -> None:
    hnsw.convert_embedding_type(op.get_bind(), "vector")
