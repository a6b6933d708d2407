"""The link to a parent hub: settings, the forwarder (store-and-forward with per-origin cursors
and exact dedupe at the parent), queue policies, status (DESIGN "The way up")."""
