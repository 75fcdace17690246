"""Tests for r1jax.data: tasks, tokenizers, templates, TFDS sources, iteration, padding."""
import json
import re
from fractions import Fraction

import numpy as np
import pytest

from r1jax.data import (
    CharTokenizer,
    HFTokenizer,
    Position,
    arithmetic_example,
    chat_segments,
    countdown_example,
    epoch_order,
    extract_boxed,
    extract_gsm8k_answer,
    iterate,
    load_source,
    pad_token_lists,
    question_and_answer,
    r1_zero_prompt,
    render_chat,
    short_completion,
    short_prompt,
    tokenize_prompts,
)
from r1jax.data import readers, tasks


# ----------------------------------------------------------------- a tiny safe evaluator


def safe_eval(expr: str) -> Fraction:
    """Evaluate ``+ - * / ( )`` over non-negative integers exactly (no ``eval``)."""
    tokens = re.findall(r"\d+|[-+*/()]", expr)
    assert "".join(tokens) == expr.replace(" ", ""), f"unexpected characters in {expr!r}"
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom():
        tok = take()
        if tok == "(":
            value = add()
            assert take() == ")"
            return value
        assert tok.isdigit(), f"expected a number, got {tok!r}"
        return Fraction(int(tok))

    def mul():
        value = atom()
        while peek() in ("*", "/"):
            value = value * atom() if take() == "*" else value / atom()
        return value

    def add():
        value = mul()
        while peek() in ("+", "-"):
            value = value + mul() if take() == "+" else value - mul()
        return value

    result = add()
    assert pos == len(tokens), f"trailing tokens in {expr!r}"
    return result


def test_safe_eval_itself():
    assert safe_eval("2+3*4") == 14
    assert safe_eval("(2+3)*4") == 20
    assert safe_eval("8/4/2") == 1
    assert safe_eval("10-(4-1)") == 7


# ------------------------------------------------------------------------------ tasks


def test_countdown_is_deterministic_and_pinned():
    assert countdown_example(0, 0) == countdown_example(0, 0)
    assert countdown_example(0, 0) != countdown_example(0, 1)
    assert countdown_example(0, 0) != countdown_example(1, 0)
    # Golden value: example (seed=0, index=0) must be the same on every machine.
    assert countdown_example(0, 0) == {
        "numbers": [63, 46, 88, 24], "target": 81, "solution": "88+(63-24)-46",
        "question": "Make 81 from 63, 46, 88, 24 using + - * / and each number once."}


def test_countdown_targets_are_reachable():
    for index in range(300):
        ex = countdown_example(3, index)
        assert 3 <= len(ex["numbers"]) <= 4
        assert all(1 <= n <= 99 for n in ex["numbers"])
        assert 1 <= ex["target"] <= 100
        assert safe_eval(ex["solution"]) == ex["target"]
        used = sorted(int(n) for n in re.findall(r"\d+", ex["solution"]))
        assert used == sorted(ex["numbers"]), ex  # each number exactly once
        assert str(ex["target"]) in ex["question"]


def test_countdown_options_and_errors():
    ex = countdown_example(0, 5, min_count=2, max_count=2, max_value=9, max_target=50)
    assert len(ex["numbers"]) == 2 and max(ex["numbers"]) <= 9
    assert safe_eval(ex["solution"]) == ex["target"] <= 50
    with pytest.raises(ValueError, match="min_count"):
        countdown_example(0, 0, min_count=5, max_count=3)
    with pytest.raises(ValueError, match="non-negative"):
        countdown_example(0, -1)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5, 6])
def test_arithmetic_expression_answers_are_correct(difficulty):
    for index in range(100):
        ex = arithmetic_example(7, index, difficulty)
        assert ex["difficulty"] == difficulty
        question = ex["question"]
        assert question.startswith("What is ") and question.endswith("?")
        expr = question[len("What is "):-1]
        assert safe_eval(expr) == int(ex["answer"])
        assert len(re.findall(r"[-+*/]", expr)) == difficulty
        steps = ex["solution"].split(", ")
        assert len(steps) == difficulty
        assert steps[-1].endswith(f"={ex['answer']}")
        for step in steps:
            lhs, rhs = step.split("=")
            assert safe_eval(lhs) == int(rhs)


@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_arithmetic_word_problems_are_correct(difficulty):
    for index in range(50):
        ex = arithmetic_example(7, index, difficulty, kind="word")
        assert ex["question"].endswith("have now?")
        assert int(ex["answer"]) >= 0
        steps = ex["solution"].split(", ")
        assert steps[-1].endswith(f"={ex['answer']}")
        for step in steps:
            lhs, rhs = step.split("=")
            assert safe_eval(lhs) == int(rhs)
        # the worked steps start from the story's first number (or a box product)
        start = int(re.search(r"has (\d+)", ex["question"]).group(1))
        assert steps[0].startswith(str(start)) or "*" in steps[0]


def test_easy_arithmetic_is_short_and_deterministic():
    for index in range(200):
        ex = arithmetic_example(0, index, 1)
        assert len(ex["question"]) <= len("What is 99+99?")
        completion = short_completion(ex["solution"], ex["answer"])
        assert len(ex["solution"]) <= len("99+99=198")
        assert len(CharTokenizer().encode(completion)) <= 16
    assert arithmetic_example(0, 0, 1) == {
        "question": "What is 56+85?", "answer": "141", "difficulty": 1, "solution": "56+85=141"}
    with pytest.raises(ValueError, match="difficulty"):
        arithmetic_example(0, 0, 0)
    with pytest.raises(ValueError, match="kind"):
        arithmetic_example(0, 0, 1, kind="poem")


# ----------------------------------------------------------------------------- answers


def test_answer_extraction():
    assert extract_gsm8k_answer("She has 3+4=<<3+4=7>>7.\n#### 1,200") == "1200"
    assert extract_gsm8k_answer("#### -5") == "-5"
    with pytest.raises(ValueError, match="####"):
        extract_gsm8k_answer("The answer is 7.")
    with pytest.raises(ValueError, match="number"):
        extract_gsm8k_answer("#### seven")
    assert extract_boxed(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{\{a, b\}}") == r"\{a, b\}"
    assert extract_boxed(r"$\boxed 5$") == "5"
    assert extract_boxed(r"\fbox{x^2}") == "x^2"
    assert extract_boxed("no box here") is None
    assert extract_boxed(r"\boxed{unbalanced") is None


# --------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip():
    tok = CharTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (103, 0, 1, 2)
    text = "What is 12+7? <think>12+7=19</think><answer>19</answer>\n(a<b) [x] {y} ~!@#$%^&*_"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok.encode(tag)) == 1 and tok.encode(tag) == [tok.token_to_id(tag)]
    assert len(tok.encode("a<b>c")) == 5  # a bare "<" is just a character
    assert tok.encode("<eos>") == [tok.token_to_id(c) for c in "<eos>"]  # no injection
    full = tok.encode("1+1", add_bos=True, add_eos=True)
    assert full[0] == tok.bos_id and full[-1] == tok.eos_id
    assert tok.decode(full + [tok.pad_id] * 3) == "1+1"
    assert tok.decode(full, skip_special_tokens=False) == "<bos>1+1<eos>"
    # decode does not stop at eos; that is the caller's job
    assert tok.decode(tok.encode("12") + [tok.eos_id] + tok.encode("34")) == "1234"
    with pytest.raises(ValueError, match="position 3"):
        tok.encode("abc\u00e9")


def _write_hf_tokenizer(folder, with_config=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<s>", "</s>", "<think>", "</think>", "<answer>", "</answer>",
                "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["What is 12+7? The answer is 19.", "Tom has 3 apples and buys 5 more.",
              "A conversation between User and Assistant."] * 20
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if with_config:
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": "<s>",
            "eos_token": {"content": "</s>", "lstrip": False, "special": True},
            "pad_token": "<pad>",
            "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
        }))
    return folder


def test_hf_tokenizer_from_built_tokenizer_json(tmp_path):
    folder = _write_hf_tokenizer(tmp_path / "tok")
    for path in (folder, folder / "tokenizer.json"):
        tok = HFTokenizer.from_file(path)
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        assert tok.chat_template.startswith("{% for m in messages")
        assert tok.vocab_size > 9
        text = "What is 12+7? <think>12+7=19</think> <answer>19</answer>"
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.token_to_id("<think>") in ids
        assert tok.decode(ids + [tok.pad_id, tok.pad_id]) == text
        assert tok.decode(ids, skip_special_tokens=False).startswith("<s>")


def test_hf_tokenizer_without_config_and_errors(tmp_path):
    folder = _write_hf_tokenizer(tmp_path / "bare", with_config=False)
    tok = HFTokenizer.from_file(folder)
    assert tok.bos_id is None and tok.eos_id is None and tok.chat_template is None
    with pytest.raises(ValueError, match="no bos_token"):
        tok.encode("hi", add_bos=True)
    tok = HFTokenizer.from_file(folder, eos_token="</s>")
    assert tok.pad_id == tok.eos_id == 2  # pad falls back to eos
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer.from_file(tmp_path / "nowhere")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the vocabulary"):
        HFTokenizer.from_file(folder)


# ---------------------------------------------------------------------------- templates


def test_templates():
    prompt = r1_zero_prompt("What is 2+3?")
    assert prompt.startswith("A conversation between User and Assistant. The user asks a "
                             "question, and the Assistant solves it.")
    assert "i.e., <think> reasoning process here </think> <answer> answer here </answer>." in prompt
    assert prompt.endswith("User: What is 2+3?. Assistant:")
    assert short_prompt("What is 2+3?") == "What is 2+3? <think>"
    assert short_completion("2+3=5", "5") == "2+3=5</think><answer>5</answer>"
    tok = CharTokenizer()
    assert len(tok.encode(short_prompt("What is 12+7?"))) == 15


def test_chat_template():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render_chat(messages, default_system="You are a helpful assistant.") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")
    assert render_chat(messages[:1], add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    trained = [text for text, is_output in chat_segments(messages) if is_output]
    assert trained == ["Hello<|im_end|>"]
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "robot", "content": "x"}])


# -------------------------------------------------------------------- TFDS procedural


def test_countdown_and_arithmetic_builders(tmp_path):
    train = load_source("countdown", "train", tmp_path, num_train=50, num_test=10)
    test = load_source("countdown", "test", tmp_path, num_train=50, num_test=10)
    assert (len(train), len(test)) == (50, 10)
    expected = {json.dumps(countdown_example(0, i), sort_keys=True) for i in range(50)}
    stored = {json.dumps(train[i], sort_keys=True) for i in range(len(train))}
    assert stored == expected  # records are exactly the generator's, as plain Python
    assert isinstance(train[0]["numbers"], list) and isinstance(train[0]["target"], int)
    test_questions = {test[i]["question"] for i in range(10)}
    assert not test_questions & {train[i]["question"] for i in range(50)}
    offset_questions = {countdown_example(0, tasks.TEST_INDEX_OFFSET + j)["question"]
                        for j in range(40)}
    assert test_questions <= offset_questions  # test draws from its own index range
    assert train[-1] == train[49]

    easy = load_source("arithmetic", "train", tmp_path, difficulty=1, num_train=50, num_test=20)
    words = load_source("arithmetic", "test", tmp_path, difficulty=2, kind="word",
                        num_train=30, num_test=5)
    assert len(easy) == 50 and len(words) == 5
    assert {easy[i]["question"] for i in range(50)} == {
        arithmetic_example(0, i, 1)["question"] for i in range(50)}
    assert words[0]["difficulty"] == 2 and words[0]["question"].endswith("have now?")
    assert question_and_answer("arithmetic", easy[0]) == (easy[0]["question"], easy[0]["answer"])
    assert question_and_answer("countdown", train[0])[1] == str(train[0]["target"])

    # reopening reuses the prepared files
    again = load_source("countdown", "train", tmp_path, num_train=50, num_test=10)
    assert again[3] == train[3]
    with pytest.raises(ValueError, match="unknown dataset"):
        load_source("cifar", "train", tmp_path)
    with pytest.raises(TypeError):
        load_source("countdown", "train", tmp_path, bogus=1)


def test_test_split_refuses_a_too_small_task_space(tmp_path):
    with pytest.raises(RuntimeError, match="task space is too small"):
        load_source("countdown", "test", tmp_path, num_train=40, num_test=30,
                    min_count=2, max_count=2, max_value=3)


# ----------------------------------------------------------------------- GSM8K / MATH

GSM8K_LINES = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                 "many clips in May. How many clips did Natalia sell altogether?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
               "<<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A shop sells 1,000 pens a day. How many pens in 2 days?",
     "answer": "1,000*2 = <<1000*2=2000>>2,000\n#### 2,000"},
]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_gsm8k_builder(tmp_path):
    manual = tmp_path / "gsm8k_files"
    _write_jsonl(manual / "train.jsonl", GSM8K_LINES)
    _write_jsonl(manual / "test.jsonl", GSM8K_LINES[:1])
    train = load_source("gsm8k", "train", tmp_path / "data", manual_dir=manual)
    test = load_source("gsm8k", "test", tmp_path / "data", manual_dir=manual)
    assert (len(train), len(test)) == (2, 1)
    by_number = {train[i]["answer_number"]: train[i] for i in range(2)}
    assert set(by_number) == {"72", "2000"}
    assert by_number["72"]["question"].startswith("Natalia sold clips")
    assert by_number["72"]["answer"].endswith("#### 72")
    assert question_and_answer("gsm8k", by_number["2000"])[1] == "2000"


def test_gsm8k_errors_name_file_line_and_field(tmp_path):
    manual = tmp_path / "bad"
    _write_jsonl(manual / "train.jsonl", [GSM8K_LINES[0], {"question": "Q?", "answer": "seven"}])
    with pytest.raises(ValueError, match=r"train\.jsonl:line 2: field 'answer'.*####"):
        list(readers.gsm8k_records(manual, "train"))
    with pytest.raises(ValueError, match=r"train\.jsonl:line 2: field 'answer'.*####"):
        load_source("gsm8k", "train", tmp_path / "data", manual_dir=manual)
    _write_jsonl(manual / "train.jsonl", [{"answer": "#### 3"}])
    with pytest.raises(ValueError, match=r"train\.jsonl:line 1: expected field 'question'"):
        list(readers.gsm8k_records(manual, "train"))
    (manual / "train.jsonl").write_text('{"question": "Q?", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:line 2: not valid JSON"):
        list(readers.gsm8k_records(manual, "train"))
    with pytest.raises(FileNotFoundError, match=r"expected .*test\.jsonl"):
        load_source("gsm8k", "test", tmp_path / "data2", manual_dir=manual)
    with pytest.raises(FileNotFoundError, match="manual_dir"):
        load_source("gsm8k", "train", tmp_path / "data3")


MATH_PROBLEMS = {
    "algebra/1.json": {"problem": "What is $\\frac{2}{4}$ in lowest terms?", "level": "Level 1",
                       "type": "Algebra",
                       "solution": "Divide by 2: $\\boxed{\\frac{1}{2}}$."},
    "geometry/7.json": {"problem": "A set?", "level": "Level ?", "type": "Geometry",
                        "solution": "First \\boxed{1}, finally $\\boxed{\\{1, 2\\}}$."},
}


def _write_math_tree(root, split, problems):
    for rel, obj in problems.items():
        path = root / split / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))


def test_math_builder_per_problem_files(tmp_path):
    manual = tmp_path / "MATH_release"
    _write_math_tree(manual / "MATH", "train", MATH_PROBLEMS)
    _write_math_tree(manual / "MATH", "test", {"algebra/3.json": MATH_PROBLEMS["algebra/1.json"]})
    train = load_source("math", "train", tmp_path / "data", manual_dir=manual)
    assert len(train) == 2
    records = {train[i]["type"]: train[i] for i in range(2)}
    assert records["Algebra"]["answer"] == "\\frac{1}{2}" and records["Algebra"]["level"] == 1
    assert records["Geometry"]["answer"] == "\\{1, 2\\}" and records["Geometry"]["level"] == -1
    assert question_and_answer("math", records["Algebra"]) == (
        MATH_PROBLEMS["algebra/1.json"]["problem"], "\\frac{1}{2}")
    assert len(load_source("math", "test", tmp_path / "data", manual_dir=manual)) == 1


def test_math_builder_jsonl_and_missing_split(tmp_path):
    manual = tmp_path / "math500"
    _write_jsonl(manual / "test.jsonl", [  # MATH-500 style: subject, int level, given answer
        {"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "answer": "2",
         "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}])
    test = load_source("math", "test", tmp_path / "data", manual_dir=manual)
    assert test[0] == {"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "answer": "2",
                       "level": 1, "type": "Prealgebra"}
    with pytest.raises(FileNotFoundError, match="train"):
        load_source("math", "train", tmp_path / "data2", manual_dir=manual)


def test_math_errors_name_file_and_field(tmp_path):
    manual = tmp_path / "bad_math"
    _write_math_tree(manual, "train", {"algebra/5.json": {
        "problem": "x?", "level": "Level 2", "type": "Algebra", "solution": "no box"}})
    with pytest.raises(ValueError, match=r"algebra/5\.json: field 'solution' has no balanced"):
        load_source("math", "train", tmp_path / "data", manual_dir=manual)
    _write_math_tree(manual, "train", {"algebra/5.json": {
        "problem": "x?", "level": "hard", "type": "Algebra", "solution": "\\boxed{1}"}})
    with pytest.raises(ValueError, match=r"algebra/5\.json: expected field 'level'"):
        list(readers.math_records(manual, "train"))


# --------------------------------------------------------------------------- iteration


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(100, seed=1, epoch=0)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(100, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(100, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(100, seed=2, epoch=0))
    assert epoch_order(8, 0, 0).tolist() == [3, 2, 1, 6, 0, 7, 4, 5]  # pinned across machines


def test_iteration_resumes_identically():
    source = [{"i": i} for i in range(23)]
    run = iterate(source, batch_size=5, seed=7)
    full = [next(run) for _ in range(12)]  # crosses two epoch boundaries
    for batch, _ in full:
        assert len(batch) == 5
    first_epoch = [r["i"] for batch, _ in full[:5] for r in batch][:23]
    assert sorted(first_epoch) == list(range(23))  # each record once per epoch

    saved = full[4][1].to_dict()  # checkpoint after 5 batches
    assert saved == {"epoch": 1, "index": 2} and all(type(v) is int for v in saved.values())
    resumed = iterate(source, batch_size=5, seed=7, position=Position.from_dict(saved))
    for batch, pos in full[5:]:
        batch2, pos2 = next(resumed)
        assert batch2 == batch and pos2 == pos
    with pytest.raises(ValueError, match="invalid"):
        next(iterate(source, 5, 7, position={"epoch": 0, "index": 99}))
    with pytest.raises(ValueError, match="empty"):
        next(iterate([], 5, 7))


def test_iteration_over_a_tfds_source(tmp_path):
    source = load_source("arithmetic", "train", tmp_path, num_train=30, num_test=5)
    run = iterate(source, batch_size=8, seed=0)
    batches = [next(run) for _ in range(6)]
    resumed = iterate(source, batch_size=8, seed=0, position=batches[2][1])
    assert [next(resumed)[0] for _ in range(3)] == [b for b, _ in batches[3:]]
    assert all(isinstance(r["question"], str) for r in batches[0][0])


# ----------------------------------------------------------------------------- padding


def test_tokenize_prompts_right_pads():
    tok = CharTokenizer()
    prompts = [short_prompt("What is 1+2?"), short_prompt("What is 12+70?")]
    tokens, lengths = tokenize_prompts(tok, prompts, max_len=20)
    assert tokens.dtype == np.int32 and lengths.dtype == np.int32 and tokens.shape == (2, 20)
    assert lengths.tolist() == [14, 16]
    assert tok.decode(tokens[0]) == prompts[0] and (tokens[0, 14:] == tok.pad_id).all()
    assert tokens[1, 15] == tok.token_to_id("<think>")
    tokens, lengths = tokenize_prompts(tok, prompts)  # width = longest prompt
    assert tokens.shape == (2, 16)
    with pytest.raises(ValueError, match=r"prompt 1 \('What is 12\+70\? <think>'\) has 16 tokens"):
        tokenize_prompts(tok, prompts, max_len=15)
    tokens, lengths = tokenize_prompts(tok, prompts, max_len=5, truncate="left")
    assert tok.decode(tokens[1]) == "70? <think>" and lengths.tolist() == [5, 5]
    tokens, _ = tokenize_prompts(tok, ["1"], max_len=3, add_bos=True)
    assert tokens.tolist() == [[tok.bos_id, tok.token_to_id("1"), tok.pad_id]]
    with pytest.raises(ValueError, match="empty"):
        pad_token_lists([[1], []], pad_id=0)
