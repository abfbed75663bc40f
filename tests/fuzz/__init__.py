"""Fuzz harnesses for everything a peer can send a qpc node or agent.

``registry`` holds the table (name -> seed corpus builder, target, allowed
exception types), ``targets`` registers the harnesses, ``mutate`` is the
seeded mutation engine used in CI (and by the long run when atheris is not
available), ``runner`` drives harnesses, and ``atheris_main`` is the
coverage-guided entry point for the long run. See docs/fuzzing.md.
"""
