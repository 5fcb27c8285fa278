"""The tuning phase's steps: PostgreSQL's settings set as the plan says (``tuning.apply``) and its gate."""
