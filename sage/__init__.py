"""SAGE: the edge runtime around a served HRM model (serving, salience, memory, sleep)."""
