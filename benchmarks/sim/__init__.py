"""The planner simulation as a package: ``world`` (traffic, prices, the providers' behaviour under
common random numbers), ``engine`` (one policy over one day, through the service's own decision
code and state machine) and ``report`` (figures, invariants, the command line).
``benchmarks/planner_sim.py`` is its command."""
