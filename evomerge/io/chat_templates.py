"""The chat formats a recipe can name in ``chat_template`` (mergekit 0.1.5's names: chatml,
llama3, alpaca, mistral, exaone), written here as Jinja for transformers' renderer
(trim_blocks, lstrip_blocks). Each renders every conversation exactly as the template of the
same name mergekit writes (tests/test_mergekit.py renders both)."""

from __future__ import annotations

# <|im_start|>role\ncontent<|im_end|>\n per message
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# the bos token once, then a header per message, its content trimmed, <|eot_id|> and a newline
LLAMA3 = (
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# the last system message on its own, a blank line, then ### Instruction / ### Input /
# ### Response sections separated by a blank line (none before the generation prompt, as mergekit's)
ALPACA = (
    "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{{ (system | last).content | trim if system else '' }}{{ '\\n\\n' }}"
    "{% set heads = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}"
    "{% for m in messages %}{% if m['role'] in heads %}"
    "{{ heads[m['role']] + '\\n' + (m['content'] | trim) }}{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
)

# [INST] turns: an optional leading system message joins the first user turn; roles must alternate
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if m['role'] == 'user' %}"
    "{{ ' [INST] ' + (system + '\\n\\n' if loop.first and system is defined else '') + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
    "{% endif %}{% endfor %}"
)

# [|role|]content, a user turn ending in a newline, others in [|endofturn|] and a newline; an
# empty system turn first where the conversation has none. mergekit's exaone file is indented
# for a renderer that strips it: under transformers' it puts those spaces and line breaks into
# every prompt. This one gives the same turns and markers without them.
EXAONE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{{ '[|' + m['role'] + '|]' + m['content'] + ('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

NAMED = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA, "mistral": MISTRAL, "exaone": EXAONE}
