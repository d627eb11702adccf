"""The prompts the RAG app answers with: grounded in the retrieved context, honest when it lacks the answer.

The rule sits after the context, next to the question, where small models follow it best;
the chunks stay verbatim so EpicLLM can find and link their cached KV.
"""

from __future__ import annotations

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.prompts import ChatPromptTemplate

NOT_IN_DOCUMENTS = "The documents do not say."
ROLE = "You answer questions about the user's documents."
RULE = (
    "Answer from this context only, in a short sentence. "
    f'If the context does not contain the answer, reply exactly: "{NOT_IN_DOCUMENTS}"'
)

QA_PROMPT = ChatPromptTemplate(
    message_templates=[
        ChatMessage(role=MessageRole.SYSTEM, content=ROLE),
        ChatMessage(
            role=MessageRole.USER,
            content=f"Context:\n---\n{{context_str}}\n---\n{RULE}\n\nQuestion: {{query_str}}",
        ),
    ]
)
REFINE_PROMPT = ChatPromptTemplate(
    message_templates=[
        ChatMessage(role=MessageRole.SYSTEM, content=ROLE),
        ChatMessage(
            role=MessageRole.USER,
            content=(
                f"Context:\n---\n{{context_msg}}\n---\n{RULE} Keep the earlier answer unless this context "
                "improves it.\n\nQuestion: {query_str}\nEarlier answer: {existing_answer}"
            ),
        ),
    ]
)

# Chat: LlamaIndex puts the context template, then the system prompt, into one system message.
CHAT_CONTEXT_TEMPLATE = f"{ROLE}\nContext:\n---\n{{context_str}}\n---\n"
CHAT_REFINE_TEMPLATE = f"{ROLE}\nMore context:\n---\n{{context_msg}}\n---\nEarlier answer: {{existing_answer}}\n"
CHAT_SYSTEM_PROMPT = RULE
