"""Read models that follow each platform's ordered log and never write to it.

Projections (statements, audit trail, disclosures, proof of liabilities) are built in their own
issue; this package is their home and must never import the writer.
"""
