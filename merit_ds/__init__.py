"""merit_ds."""
