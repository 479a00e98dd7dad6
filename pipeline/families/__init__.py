"""The warm pool's model families, one module per kind (named by the kind's registry entry); see base.py.

Nothing is imported here: the worker loads only the family of the model it was launched for.
"""
