"""A search's state in storage (a local folder or an object store, through pyarrow).

``storage`` names locations and writes files whole; ``records`` is normlab's search record
beside Ray's state (what resume and report need); ``snapshots`` keeps last-known-good copies
of Ray Tune's experiment state.
May import: ``searchfile``, ``tracking``, trainables.
"""
