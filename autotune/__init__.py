"""Galvatron-DS planner: hardware and model descriptions, cost model, search, plan file."""
