"""Pure planners: (domain, host topology, ledger, config) → a typed plan. No I/O in this package."""
