"""Discover: a customer's need in plain words → the LLM imagines items → pgvector finds real ones."""
