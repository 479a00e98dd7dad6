"""Alembic migrations of the job ledger (run programmatically by Ledger.open; no alembic.ini needed).

A package only so that setuptools ships these files; nothing here is imported by the daemon at run time.
"""
