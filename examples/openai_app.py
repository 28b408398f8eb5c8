import os

from openai import OpenAI

# was: client = OpenAI()  -- api.openai.com with OPENAI_API_KEY; now the gateway and an agentpool key
client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=os.environ["AGENTPOOL_KEY"])

history = [{"role": "user", "content": "Where is my order?"}]
reply = client.chat.completions.create(model="support", messages=history)
print(reply.choices[0].finish_reason, reply.usage.total_tokens, reply.choices[0].message.content)

history.append({"role": "assistant", "content": reply.choices[0].message.content})
history.append({"role": "user", "content": "When will it arrive?"})
stream = client.chat.completions.create(model="support", messages=history, stream=True)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="")
print()
