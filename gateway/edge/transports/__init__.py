"""One module per carrier dialect, each translating its wire format to and from CallEvents."""
