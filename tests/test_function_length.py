"""House rule: no function of pretrain/, data_pipeline/ or launch/ is over 60 lines, the command-line
parser (one flat list of options) excepted; a longer one is split into named steps."""
import ast

from tests.test_import_graph import module_files

LIMIT = 60
EXEMPT = {("pretrain.main", "build_parser")}


def function_lengths():
    """(lines, module, function) of every function and method."""
    for module, path in module_files().items():
        with open(path) as handle:
            tree = ast.parse(handle.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield node.end_lineno - node.lineno + 1, module, node.name


def test_no_function_is_over_sixty_lines_outside_the_cli_parser():
    long = sorted((lines, f"{module}.{name}") for lines, module, name in function_lengths()
                  if lines > LIMIT and (module, name) not in EXEMPT)
    assert not long, f"functions over {LIMIT} lines: {long}"


def test_the_count_sees_the_parser_it_exempts():
    lengths = {(module, name): lines for lines, module, name in function_lengths()}
    assert lengths[("pretrain.main", "build_parser")] > LIMIT  # so the rule would catch a long function
