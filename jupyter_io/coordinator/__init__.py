"""The marketplace coordinator: provider registry, offers, scheduling, leases, relay, store."""
