"""The medical-imaging tasks of OmniFM (classification so far)."""
