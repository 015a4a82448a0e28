"""The Tk window: a client of the same generation code as the command line."""
