"""Credentials in URLs: kept out of stored state and out of every message.

``uris`` masks (``mask_uri``), strips (``strip_credentials``) and scrubs (``scrub``) the
``user:password@`` part and secret-looking query values of a URI, and finds the password a
database URL carries (``url_password``); tracking, storage and the search-file validator all
use it, so there is one rule for what counts as a secret.
May import: nothing else of orchestrator.
"""
