"""NAMD evaluation: classification metrics over seeds, Frechet distance, prediction variance."""
