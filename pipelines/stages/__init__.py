"""One module per pipeline stage; each reads what the previous stage wrote."""
