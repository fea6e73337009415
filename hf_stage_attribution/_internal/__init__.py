"""Helpers every layer may use: content hashing, parameter spaces, model copies, atomic writes, table rendering.

Nothing here imports another folder of the package except ``errors``.
"""
