"""A team agent: a planner, specialists and a synthesis, built once per replica."""
