"""The thin shared package of the book's companion code.

Nothing heavy is imported here: submodules import transformers, deepspeed or onnx only inside
the functions that need them, so `import common` stays fast.
"""
