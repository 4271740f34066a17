"""Command-line shells over the `degrade` library (click); they parse, call one function, report."""
