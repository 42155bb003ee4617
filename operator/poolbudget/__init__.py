"""poolbudget: keep PostgreSQL connection pools inside the database's connection limit."""

__version__ = "0.1.0"
