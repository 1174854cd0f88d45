/** A tiny element builder for the plain-DOM widgets, and in-place updates for them. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: { [name: string]: string | undefined } = {},
  ...children: (Node | string | null | undefined | false)[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined) {
      el.setAttribute(name, value);
    }
  }
  for (const child of children) {
    if (child !== null && child !== undefined && child !== false) {
      el.append(child);
    }
  }
  return el;
}

/** Set `el`'s text only if it differs (no mutation, no relayout, when nothing changed). */
export function setText(el: HTMLElement, text: string): void {
  if (el.textContent !== text) {
    el.textContent = text;
  }
}

/** Set (or, for null, remove) an attribute only if it differs. */
export function setAttr(el: HTMLElement, name: string, value: string | null): void {
  if (value === null) {
    if (el.hasAttribute(name)) {
      el.removeAttribute(name);
    }
  } else if (el.getAttribute(name) !== value) {
    el.setAttribute(name, value);
  }
}

/** Show or hide `el` (the `hidden` attribute). */
export function show(el: HTMLElement, visible: boolean): void {
  if (el.hidden === visible) {
    el.hidden = !visible;
  }
}

/**
 * Make `parent`'s children exactly `nodes`, in order, moving only what is out of place:
 * nodes that stay keep their identity (focus, a click in flight, a hover).
 */
export function placeChildren(parent: HTMLElement, nodes: Node[]): void {
  nodes.forEach((node, index) => {
    if (parent.childNodes[index] !== node) {
      parent.insertBefore(node, parent.childNodes[index] ?? null);
    }
  });
  while (parent.childNodes.length > nodes.length) {
    parent.lastChild!.remove();
  }
}

/**
 * One view per key, kept across renders: the views of keys still in `items` are reused,
 * missing ones are made with `make`, the others forgotten. Each view is brought up to date
 * with `update`; returns the views' nodes in the items' order, for {@link placeChildren}.
 */
export function keyedNodes<T, V extends { readonly node: HTMLElement }>(
  views: Map<string, V>,
  items: readonly T[],
  key: (item: T) => string,
  make: (item: T) => V,
  update: (view: V, item: T) => void
): HTMLElement[] {
  const seen = new Set<string>();
  const nodes = items.map(item => {
    const k = key(item);
    seen.add(k);
    let view = views.get(k);
    if (!view) {
      view = make(item);
      views.set(k, view);
    }
    update(view, item);
    return view.node;
  });
  for (const k of [...views.keys()]) {
    if (!seen.has(k)) {
      views.delete(k);
    }
  }
  return nodes;
}
