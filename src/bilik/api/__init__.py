"""Control plane: the HTTP application ``bilik serve`` runs."""
