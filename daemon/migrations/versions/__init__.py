"""Ledger schema revisions, oldest first (0001 creates the tables).

Each revision is frozen once released: never edit one, add the next.
"""
