"""The rehearsal: a whole migration into scratch resources on the target, measured and torn down."""
