"""Running a job: a config made into a finished, logged run (build, pipeline, stop signals,
sweep glue, resume, re-tune). The only package that writes to MLflow."""
