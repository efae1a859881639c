"""End-to-end jobs (the NAMD training job) built from the data, training and tracking layers."""
