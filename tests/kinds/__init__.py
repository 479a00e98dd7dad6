"""Job kinds that exist only for the tests (registered through WANBOX_KINDS or by the tests themselves)."""
