"""The work Ray runs: plain functions that take and return plain data (specs, plans, tensors,
``jobs.results``) and never log to MLflow. ``env`` holds what every task starts from."""
