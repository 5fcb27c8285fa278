"""The decommission of the Supabase project: its final archive, proven, and what Liftoff left on it dropped."""
