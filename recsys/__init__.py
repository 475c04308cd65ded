"""recsys: an LLM-reranked, personalized product recommender on PostgreSQL + pgvector."""

__version__ = "0.1.0"
