-- Runs once, when the postgres volume is created empty (docker-entrypoint-initdb.d), as
-- POSTGRES_USER in the database POSTGRES_DB=optuna, Optuna's. MLflow gets a database of its own:
-- both keep an alembic_version table, so they cannot share one.
CREATE DATABASE mlflow;
