"""The fault and bad-input suite (issue 7, item 5)."""
