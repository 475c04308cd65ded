"""The catalog and its customers: ingest purchases, embed products, search them, read histories."""
