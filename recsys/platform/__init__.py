"""What every concept stands on: the database (engine, tables, migrations, SQL objects), the broker client,
the embedded Postgres and Valkey servers, API keys and admin users, and what the CPU can do."""
