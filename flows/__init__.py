"""Prefect flows: sweeps of the DVC pipeline over beta schedules and T."""
