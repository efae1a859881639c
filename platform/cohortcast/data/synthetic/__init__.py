"""Synthetic longitudinal chest-CT cohort: clinical model, phantom, reports, writers."""

from cohortcast.data.synthetic.cohort import generate_cohort

__all__ = ["generate_cohort"]
